"""What a client does: receive its payload, train locally on its partition, return its update."""
