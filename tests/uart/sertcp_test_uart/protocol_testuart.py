"""testuart://DIR: a simulated UART whose modem lines the test sets.

DIR/lines holds the names of the input lines that are on now, separated
by spaces ("DSR CD CTS RI"); the test rewrites it (write a temporary file
and rename, so a read never sees half of it).  What sertcp writes to the
port is appended to DIR/tx; each start and end of a break is a line
"on TIME" or "off TIME" (time.monotonic()) in DIR/breaks.  What the test
appends to DIR/rx is received, once, in order.  DIR/out holds the output
lines that are on now ("DTR RTS"), rewritten at each change."""
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
        self._rx_offset = 0
        self.is_open = True
        self._reconfigure_port()
        self._update_dtr_state()

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

    def _pending(self, size):
        try:
            with open(os.path.join(self.folder, "rx"), "rb") as f:
                f.seek(self._rx_offset)
                return f.read(size)
        except FileNotFoundError:
            return b""

    @property
    def in_waiting(self):
        return len(self._pending(4096))

    def read(self, size=1):
        if not self.is_open:
            raise SerialException("testuart: port not open")
        data = self._pending(size)
        if not data:
            time.sleep(self._timeout or 0.05)
            data = self._pending(size)
        self._rx_offset += len(data)
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
        self._update_dtr_state()

    def _update_dtr_state(self):
        if not getattr(self, "folder", None):
            return
        on = [name for name, state in (("DTR", self._dtr_state), ("RTS", self._rts_state)) if state]
        tmp = os.path.join(self.folder, "out.tmp")
        with open(tmp, "w") as f:
            f.write(" ".join(on))
        os.replace(tmp, os.path.join(self.folder, "out"))

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
