"""The PCI DSS entity's trust zone: the card vault and the PciRelay tokenization worker."""
