"""User session functions: ``single_session(cfg: dict) -> float``, one per experiment."""
