"""Test harness: a database server for the run, a view of its sessions, and runners for examples."""
