"""A data holder's Flower ClientApp. Logic lives in fedtune.client."""

from flwr.clientapp import ClientApp

from fedtune.client import handle_evaluate, handle_train

app = ClientApp()
app.train()(handle_train)
app.evaluate()(handle_evaluate)
