"""Replay buffers, schedules, mixing of replayed and new data, replay losses (grows with the replay issue)."""
