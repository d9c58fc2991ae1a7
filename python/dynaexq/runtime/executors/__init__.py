"""Expert executors: where routed tokens meet expert weights, one per device kind."""
