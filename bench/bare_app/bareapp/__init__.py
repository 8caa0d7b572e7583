"""A bare Flower app: FedAvg of a logistic regression on random rows (Flower's floor)."""
