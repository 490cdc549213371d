"""testuart://DIR: a simulated UART whose modem lines the test sets.

DIR/lines holds the names of the input lines that are on now, separated
by spaces ("DSR CD CTS RI"); the test rewrites it (write a temporary file
and rename, so a read never sees half of it).  What sertcp writes to the
port is appended to DIR/tx; each start and end of a break is a line
"on TIME" or "off TIME" (time.monotonic()) in DIR/breaks.  DIR/dtr holds
"on" or "off", the DTR sertcp set last.  Bytes the test puts in DIR/rx
(write a temporary file and rename) are received once, then the file is
gone; nothing else is ever received."""
import os
import time

from serial.serialutil import SerialBase, SerialException


class Serial(SerialBase):

    def open(self):
        if self._port is None:
            raise SerialException("port must be configured before it can be used")
        self.folder = self._port.split("://", 1)[1].rstrip("/")
        if not os.path.isdir(self.folder):
            raise SerialException("testuart: no directory %s" % self.folder)
        self.is_open = True
        self._reconfigure_port()

    def close(self):
        self.is_open = False

    def _reconfigure_port(self):
        pass

    def _line(self, name):
        if not self.is_open:
            raise SerialException("testuart: port not open")
        try:
            with open(os.path.join(self.folder, "lines")) as f:
                return name in f.read().split()
        except FileNotFoundError:
            return False

    @property
    def in_waiting(self):
        return 0

    def read(self, size=1):
        if not self.is_open:
            raise SerialException("testuart: port not open")
        taken = os.path.join(self.folder, "rx.taken")
        try:
            os.replace(os.path.join(self.folder, "rx"), taken)
        except FileNotFoundError:
            time.sleep(self._timeout or 0.05)
            return b""
        with open(taken, "rb") as f:
            data = f.read()
        os.unlink(taken)
        return data

    def write(self, data):
        if not self.is_open:
            raise SerialException("testuart: port not open")
        with open(os.path.join(self.folder, "tx"), "ab") as f:
            f.write(bytes(data))
        return len(data)

    def reset_input_buffer(self):
        pass

    def reset_output_buffer(self):
        pass

    def _update_break_state(self):
        with open(os.path.join(self.folder, "breaks"), "a") as f:
            f.write("%s %.6f\n" % ("on" if self._break_state else "off", time.monotonic()))

    def _update_rts_state(self):
        pass

    def _update_dtr_state(self):
        tmp = os.path.join(self.folder, "dtr.tmp")
        with open(tmp, "w") as f:
            f.write("on" if self._dtr_state else "off")
        os.replace(tmp, os.path.join(self.folder, "dtr"))

    @property
    def cts(self):
        return self._line("CTS")

    @property
    def dsr(self):
        return self._line("DSR")

    @property
    def ri(self):
        return self._line("RI")

    @property
    def cd(self):
        return self._line("CD")
