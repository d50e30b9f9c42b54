-- User erasure (GDPR Art. 17, BX1): an erased user's messages stay as tombstones, marked so
-- clients can say why the body is gone (Message.sender_erased). The user's row stays too,
-- pseudonymised (conversations and messages refer to it), with the status 'erased'.
ALTER TABLE messages ADD COLUMN erased boolean NOT NULL DEFAULT false;
ALTER TABLE messages ADD CONSTRAINT messages_erased_check CHECK (NOT erased OR ciphertext IS NULL);
