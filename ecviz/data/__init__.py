"""Training data: the synthetic shapes set with ground truth (`shapes`) and real image-caption pairs
(`imagetext`)."""
