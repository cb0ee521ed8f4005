"""Deployment on separate machines: a SuperLink for the server, one SuperNode per data
holder, TLS and SuperNode authentication on by default (see README, "Deploy on several machines")."""
