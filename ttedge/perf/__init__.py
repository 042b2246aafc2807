"""Hardware specifications, the roofline of an op and of a whole model, and the capacity planner."""
