"""Sources and sinks. Only this package imports a Kafka client library.

The engine talks to Kafka through the small interfaces in :mod:`connectors.base`; the
confluent-kafka implementation is :mod:`connectors.confluent`.
"""
