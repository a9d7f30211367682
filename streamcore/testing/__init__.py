"""Testing a job without a broker: :class:`TestDriver` runs it in this process on the
in-memory backend with a manual clock (see the README, "Testing a job")."""

from streamcore.testing.driver import Record, StoreView, TestDriver

__all__ = ["Record", "StoreView", "TestDriver"]
