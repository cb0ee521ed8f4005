"""The coordinator's Flower ServerApp. Logic lives in fedtune.server."""

from flwr.serverapp import ServerApp

from fedtune.server import main

app = ServerApp()
app.main()(main)
