ALTER TABLE consent_records DROP COLUMN language;
DROP TABLE consent_text_translations;
ALTER TABLE consent_texts DROP COLUMN language;
