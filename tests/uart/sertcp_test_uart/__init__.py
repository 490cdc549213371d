"""pyserial URL handlers of the test suite (see ../sitecustomize.py)."""
