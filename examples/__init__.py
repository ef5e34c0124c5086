"""Programs that embed tcppunch through its public API (``tcppunch.peer``)."""
