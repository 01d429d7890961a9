"""KV tiers below the device pool: host memory, disk, and whatever plugins register."""
