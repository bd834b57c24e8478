"""The async source of the I/O shells; ``_sync`` is generated from it by unasync. Edit only this one."""
