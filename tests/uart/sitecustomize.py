"""Makes the test suite's simulated UART (testuart://DIR) known to pyserial
in a sertcp process started with this directory on PYTHONPATH: pyserial
looks for URL handlers in the packages of serial.protocol_handler_packages."""
import serial

serial.protocol_handler_packages.append("sertcp_test_uart")
