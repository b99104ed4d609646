"""The one model of the bench's Django project: a row each request transaction creates."""
