"""Serving over Redis: the request stream, the scheduler, the step loop and its results."""
