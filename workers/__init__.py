"""Example participants of the order-fulfillment saga."""
