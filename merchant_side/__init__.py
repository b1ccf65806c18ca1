"""The merchant's trust zone: the MerchantGateway gRPC service. Never sees card data."""
