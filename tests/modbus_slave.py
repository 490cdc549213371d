"""A pymodbus RTU slave on a serial port, for the Modbus gateway tests:
  python3 modbus_slave.py PATH BAUDRATE UNIT[,UNIT...]
Holding register N of unit U starts as U * 100 + N (N < 200); broadcasts
(unit 0) are applied to every unit.  It prints "ready" once the port is
open and runs until killed."""
import asyncio
import sys

from pymodbus.datastore import ModbusDeviceContext, ModbusSequentialDataBlock, ModbusServerContext
from pymodbus.server import ModbusSerialServer


def registers(unit):
    return ModbusSequentialDataBlock(1, [unit * 100 + n for n in range(200)])


async def main(path, baudrate, units):
    context = ModbusServerContext(devices={u: ModbusDeviceContext(hr=registers(u)) for u in units}, single=False)
    server = ModbusSerialServer(context, port=path, baudrate=baudrate, broadcast_enable=True)
    task = asyncio.ensure_future(server.serve_forever())
    while not server.transport:
        await asyncio.sleep(0.01)
    print("ready", flush=True)
    await task


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), [int(u) for u in sys.argv[3].split(",")]))
