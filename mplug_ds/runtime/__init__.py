"""Process-level helpers every entry point shares: launch environment, RNG, run guards, master-weight access."""
