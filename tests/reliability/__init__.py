"""Reliability and security suite (issue 7): faults, kills, concurrent writers, bad input, security."""
