"""Result records: writing, reading and checking them, where they go, migrating old ones."""
