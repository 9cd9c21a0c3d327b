"""Test harnesses that ship with raybig (multi-host clusters on one machine)."""
