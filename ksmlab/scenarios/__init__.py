"""Built-in scenarios: `ksmlab run NAME` (see ksmlab.scenario for the format)."""
