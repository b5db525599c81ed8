"""Lost answers, outages, frozen and killed workers, hostile configs and database writers."""
