"""Developer tools: the Flex simulator, the demo, benches, the local stack and its test PKI.

They install apart from the zones (flex-relay-dev) and are never imported by the core.
"""
