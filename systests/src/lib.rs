//! The system tests of the workspace live in `tests/`: each starts the real
//! proxy, backends and AI nodes as processes (through `testkit`) and drives
//! them as users and operators would, hostile ones included; the fault
//! suites stop and restart a Redis of their own. This library is empty.
