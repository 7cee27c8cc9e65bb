"""Zarkov: an event logger, a ZeroMQ map-reduce framework and an incremental
aggregation service for near-real-time analytics on MongoDB."""

__version__ = "0.2.0"
