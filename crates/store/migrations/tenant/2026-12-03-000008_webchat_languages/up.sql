-- The website chat in several languages: a widget's texts (WidgetSettings.translations) and each
-- consent text version come in the widget's own language and in translations, and every
-- consent answer names the language of the text the visitor was shown.

-- The language of a version's own text: the widget's language when it was published. Texts
-- published before widgets had a language were in the default language, English.
ALTER TABLE consent_texts
    ADD COLUMN language text NOT NULL DEFAULT 'en' CHECK (language ~ '^[a-z]{2}$');
ALTER TABLE consent_texts ALTER COLUMN language DROP DEFAULT;

-- The same version in other languages: published with it, never changed afterwards.
CREATE TABLE consent_text_translations (
    widget_id   uuid NOT NULL,
    version     integer NOT NULL,
    language    text NOT NULL CHECK (language ~ '^[a-z]{2}$'),
    text        text NOT NULL,
    text_sha256 bytea NOT NULL CHECK (length(text_sha256) = 32),
    PRIMARY KEY (widget_id, version, language),
    FOREIGN KEY (widget_id, version) REFERENCES consent_texts (widget_id, version)
);

-- The language of the text an answer answered (its hash is that text's).
ALTER TABLE consent_records
    ADD COLUMN language text NOT NULL DEFAULT 'en' CHECK (language ~ '^[a-z]{2}$');
ALTER TABLE consent_records ALTER COLUMN language DROP DEFAULT;
