"""Integrations of eventctx with other frameworks; each is an optional extra."""
