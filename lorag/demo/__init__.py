"""`lorag demo`: the bundled demo data, sample requests and the tiny dev model."""
