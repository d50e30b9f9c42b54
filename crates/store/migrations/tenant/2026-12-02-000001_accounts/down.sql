DROP TABLE chat_codes;
DROP TABLE users;
