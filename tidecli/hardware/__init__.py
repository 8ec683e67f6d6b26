"""Probing and measuring the host: GPU, PCIe, CPU, RAM; hardware profiles."""
