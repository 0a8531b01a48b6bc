"""The client layer: the gateway (request, submit, retries, breakers) and its inbox."""
