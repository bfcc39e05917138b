"""Brokers: the contract (:mod:`celeriac.brokers.base`) and one module per transport."""
