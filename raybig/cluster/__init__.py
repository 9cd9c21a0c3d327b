"""Where raybig finds and starts Ray: addresses, tokens, ports, local clusters."""
