"""Example plug-ins for `task: custom` (jobs/plugin_custom.yaml)."""
