"""The Flex API v2 client: sessions (HTTP Signature), public keys, tokens, and JOSE checks."""
