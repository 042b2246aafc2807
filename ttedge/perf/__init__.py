"""Hardware specifications and, later, the roofline and capacity planner."""
