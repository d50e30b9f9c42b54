/**
 * The widget's own words, in German and English, in one place so that a translation is one
 * file's change. Texts that come from the tenant (consent text, welcome and offline messages,
 * field labels and purposes) and from agents are shown as given and never pass through here.
 */

export type Lang = "de" | "en";

const en = {
  launcher: "Chat with us",
  launcherResume: "Continue chat",
  launcherUnread: "New message",
  launcherClose: "Close chat",
  panelTitle: "Chat",
  close: "Close",
  back: "Back to chat",
  connecting: "Connecting…",
  tryAgain: "Try again",
  consentTitle: "Before we chat",
  privacyPolicy: "Privacy policy",
  accept: "Accept",
  decline: "Decline",
  consentRemember: (days: number) =>
    days > 0
      ? `If you accept, this chat remembers you on this device for ${days === 1 ? "1 day" : `${days} days`}, so you can continue it later.`
      : "If you accept, this chat remembers you on this device, so you can continue it later.",
  consentNeeded: "This chat needs your consent. Nothing has been sent.",
  personalNeedsConsent:
    "This chat needs personal details, which can only be given with your consent.",
  reconsider: "Review consent",
  fieldsTitle: "Before we start",
  release: "Send this to the organisation",
  required: "(required)",
  fillIn: (label: string) => `Please fill in “${label}”.`,
  fillInAndRelease: (label: string) =>
    `Please fill in “${label}” and tick “Send this to the organisation”.`,
  checkField: (label: string) => `Please check “${label}”.`,
  fieldsMissing: "Some details are still needed before the chat can start.",
  start: "Start chat",
  messageLabel: "Your message",
  send: "Send",
  leaveMessage: "Leave message",
  you: "You",
  agent: "Agent",
  edit: "Edit",
  editLabel: "Edit your message",
  sendAgain: "Please send your message again.",
  save: "Save",
  cancel: "Cancel",
  delete: "Delete",
  edited: "edited",
  deletedMessage: "Message deleted",
  masked: "Parts of this message were hidden.",
  offline: "Nobody can answer right now. Leave a message and we will reply later.",
  noAgents: "Nobody can answer in this chat at the moment. Please contact the organisation another way.",
  ended: "This conversation has ended.",
  startNew: "Start a new chat",
  myData: "My data",
  fields: "Details you gave",
  noFields: "None.",
  consentAnswers: "Your consent answers",
  changeConsent: "Change my consent",
  consentRecorded: "Your answer was saved.",
  consentWithdrawn: "You declined: nothing personal will be asked in this chat.",
  moreFieldsTitle: "Details you can give now",
  continueChat: "Continue chat",
  consentAnswer: (version: number, granted: boolean, time: string) =>
    `Version ${version}: ${granted ? "accepted" : "declined"}${time ? `, ${time}` : ""}`,
  messages: (n: number) => (n === 1 ? "1 message" : `${n} messages`),
  saveCorrections: "Save corrections",
  corrected: "Your corrections were saved.",
  download: "Download my data",
  deleteData: "Delete my data",
  deleteWarning:
    "This deletes your details and messages and ends this chat. It cannot be undone.",
  deleteConfirm: "Yes, delete everything",
  deleted: "Your data was deleted.",
  legalHold:
    "Deletion is blocked by a legal hold on this conversation. Nothing was deleted.",
  legalHoldEdit: "This message cannot be changed: the conversation is under a legal hold.",
  loading: "Loading…",
  errorGeneric: "Something went wrong. Please try again.",
  errorUnavailable: "The chat cannot be reached right now. Please try again.",
  errorNotFound: "This chat is not available.",
  errorRateLimited: (seconds: number) =>
    seconds > 0
      ? `Too many requests. Please wait ${seconds} seconds and try again.`
      : "Too many requests. Please wait a moment and try again.",
  errorTooLarge: "This message is too long.",
  errorInvalid: "Please check your input.",
};

export type Strings = typeof en;

const de: Strings = {
  launcher: "Chatten Sie mit uns",
  launcherResume: "Chat fortsetzen",
  launcherUnread: "Neue Nachricht",
  launcherClose: "Chat schließen",
  panelTitle: "Chat",
  close: "Schließen",
  back: "Zurück zum Chat",
  connecting: "Verbindung wird hergestellt …",
  tryAgain: "Erneut versuchen",
  consentTitle: "Bevor wir chatten",
  privacyPolicy: "Datenschutzerklärung",
  accept: "Zustimmen",
  decline: "Ablehnen",
  consentRemember: (days) =>
    days > 0
      ? `Wenn Sie zustimmen, merkt sich dieser Chat Sie auf diesem Gerät für ${days === 1 ? "1 Tag" : `${days} Tage`}, damit Sie ihn später fortsetzen können.`
      : "Wenn Sie zustimmen, merkt sich dieser Chat Sie auf diesem Gerät, damit Sie ihn später fortsetzen können.",
  consentNeeded: "Dieser Chat braucht Ihre Einwilligung. Es wurde nichts gesendet.",
  personalNeedsConsent:
    "Dieser Chat braucht persönliche Angaben, die nur mit Ihrer Einwilligung gemacht werden können.",
  reconsider: "Einwilligung prüfen",
  fieldsTitle: "Bevor es losgeht",
  release: "An die Organisation senden",
  required: "(Pflichtfeld)",
  fillIn: (label) => `Bitte füllen Sie „${label}“ aus.`,
  fillInAndRelease: (label) =>
    `Bitte füllen Sie „${label}“ aus und setzen Sie das Häkchen bei „An die Organisation senden“.`,
  checkField: (label) => `Bitte prüfen Sie „${label}“.`,
  fieldsMissing: "Bevor der Chat beginnen kann, fehlen noch Angaben.",
  start: "Chat beginnen",
  messageLabel: "Ihre Nachricht",
  send: "Senden",
  leaveMessage: "Nachricht hinterlassen",
  you: "Sie",
  agent: "Team",
  edit: "Bearbeiten",
  editLabel: "Ihre Nachricht bearbeiten",
  sendAgain: "Bitte senden Sie Ihre Nachricht erneut.",
  save: "Speichern",
  cancel: "Abbrechen",
  delete: "Löschen",
  edited: "bearbeitet",
  deletedMessage: "Nachricht gelöscht",
  masked: "Teile dieser Nachricht wurden unkenntlich gemacht.",
  offline:
    "Gerade kann niemand antworten. Hinterlassen Sie eine Nachricht, wir melden uns später.",
  noAgents:
    "In diesem Chat kann gerade niemand antworten. Bitte wenden Sie sich auf anderem Weg an die Organisation.",
  ended: "Dieses Gespräch ist beendet.",
  startNew: "Neuen Chat beginnen",
  myData: "Meine Daten",
  fields: "Ihre Angaben",
  noFields: "Keine.",
  consentAnswers: "Ihre Antworten zur Einwilligung",
  changeConsent: "Einwilligung ändern",
  consentRecorded: "Ihre Antwort wurde gespeichert.",
  consentWithdrawn: "Sie haben abgelehnt: In diesem Chat wird nichts Persönliches erfragt.",
  moreFieldsTitle: "Angaben, die Sie jetzt machen können",
  continueChat: "Chat fortsetzen",
  consentAnswer: (version, granted, time) =>
    `Version ${version}: ${granted ? "zugestimmt" : "abgelehnt"}${time ? `, ${time}` : ""}`,
  messages: (n) => (n === 1 ? "1 Nachricht" : `${n} Nachrichten`),
  saveCorrections: "Korrekturen speichern",
  corrected: "Ihre Korrekturen wurden gespeichert.",
  download: "Meine Daten herunterladen",
  deleteData: "Meine Daten löschen",
  deleteWarning:
    "Das löscht Ihre Angaben und Nachrichten und beendet diesen Chat. Das lässt sich nicht rückgängig machen.",
  deleteConfirm: "Ja, alles löschen",
  deleted: "Ihre Daten wurden gelöscht.",
  legalHold:
    "Das Löschen ist durch eine gesetzliche Aufbewahrungspflicht (Legal Hold) für dieses Gespräch gesperrt. Es wurde nichts gelöscht.",
  legalHoldEdit:
    "Diese Nachricht kann nicht geändert werden: Für das Gespräch gilt eine Aufbewahrungspflicht (Legal Hold).",
  loading: "Wird geladen …",
  errorGeneric: "Etwas ist schiefgegangen. Bitte versuchen Sie es erneut.",
  errorUnavailable: "Der Chat ist gerade nicht erreichbar. Bitte versuchen Sie es erneut.",
  errorNotFound: "Dieser Chat ist nicht verfügbar.",
  errorRateLimited: (seconds) =>
    seconds > 0
      ? `Zu viele Anfragen. Bitte warten Sie ${seconds} Sekunden und versuchen Sie es erneut.`
      : "Zu viele Anfragen. Bitte warten Sie einen Moment und versuchen Sie es erneut.",
  errorTooLarge: "Diese Nachricht ist zu lang.",
  errorInvalid: "Bitte prüfen Sie Ihre Eingabe.",
};

/**
 * The visitor's languages in order of preference decide: the first that is German or English
 * wins (so "fr, de" gives German, "en-US, de" English); neither gives English.
 */
export function pickLanguage(languages: readonly string[]): Lang {
  for (const language of languages) {
    const primary = language.toLowerCase().split("-")[0];
    if (primary === "de" || primary === "en") {
      return primary;
    }
  }
  return "en";
}

/**
 * The visitor's languages, best first, for GetWidgetConfig to choose the organisation's texts
 * by (it takes up to 10 tags of up to 35 characters).
 */
export function visitorLanguages(): string[] {
  const languages = navigator.languages?.length ? navigator.languages : [navigator.language];
  return languages.filter((tag) => tag && tag.length <= 35).slice(0, 10);
}

export function strings(lang: Lang): Strings {
  return lang === "de" ? de : en;
}
