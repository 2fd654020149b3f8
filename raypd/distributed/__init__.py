"""Distributed plumbing: the only part of raypd that imports ray and deepspeed."""
