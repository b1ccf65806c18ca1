"""An embedded Flex API v2 simulator, faithful to the wire notes, for demos and tests.

It does its JOSE with the `cryptography` primitives rather than the client's jwcrypto code, so
the client is tested against an independent implementation.
"""
