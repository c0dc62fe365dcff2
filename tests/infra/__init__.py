"""Tests against real external services (etcd, sshd, ...) that the test setup starts itself; marked ``infra``."""
