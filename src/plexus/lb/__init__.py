"""Services and load balancing: stable virtual IPs and names in front of changing containers."""
