-- A TOTP code confirms one action only: the time step of the last code accepted for a user,
-- so the same code (or an older one) is refused within its window of validity.
ALTER TABLE users ADD COLUMN totp_last_step bigint;
