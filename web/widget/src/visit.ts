/**
 * One visit, from the first click on the launcher to its end: the widget's configuration,
 * StartVisit (resuming the stored visit when there is one), the consent question, the pre-chat
 * form, then the chat. Nothing here runs, and nothing is stored, before the visitor opens the
 * chat.
 *
 * Consent decides what may be asked: without it, personal fields are not shown, and the chat
 * runs only where the widget allows anonymous chats and requires no personal field. A resumed
 * visit skips the form (its fields were given before, or were optional); should a required one
 * be missing after all, the server says so on the first send and the form comes back.
 *
 * The answer can be changed at any time from "My data": a grant then offers the personal fields
 * not given yet, a decline means nothing personal is asked from then on. The chat goes on as it
 * was, the same Chat with the same stream, since it is only taken off the screen meanwhile.
 *
 * The answer also decides where the token is kept (see store.ts): on this device only with a
 * grant to the current text, and only where the widget remembers visitors; otherwise with the
 * tab, which is also where it goes before the answer is known.
 */

import { Chat } from "./chat";
import { type Api, CALL, Code, errorText, failure, retryUnavailable } from "./client";
import { askConsent } from "./consent";
import { fieldsForm, type FieldInput } from "./fields";
import { visitorLanguages } from "./i18n";
import type { PreChatField, WidgetConfig } from "./gen/hafen/webchat/v1/webchat_pb";
import { openMyData } from "./mydata";
import type { Shell } from "./shell";
import { forgetStored, readStored, writeStored } from "./store";
import { h } from "./ui";

export class Visit {
  private config: WidgetConfig | null = null;
  private granted = false;
  private resumed = false;
  /** The visit's token, once StartVisit gave it. */
  private token = "";
  /** Whether the pre-chat form was answered or skipped, and whether it could show personal fields. */
  private fieldsDone = false;
  private personalAsked = false;
  /** The keys of the fields the visit holds; null when not known (a resumed visit). */
  private given: Set<string> | null = null;
  private chat: Chat | null = null;
  /** Whether a visit is open or being opened. */
  private active = false;
  /** Whether the last visit ended while the page was open: a new one starts on request only. */
  private ended = false;

  constructor(
    private readonly shell: Shell,
    private readonly api: Api,
    private readonly widgetId: string,
  ) {}

  /** The panel was opened: the first time, open the visit. */
  opened(): void {
    if (!this.active && !this.ended) {
      void this.start();
    }
  }

  myData(): void {
    openMyData({
      shell: this.shell,
      api: this.api,
      fields: this.config?.preChatFields ?? [],
      onChangeConsent: this.config?.consentText ? () => this.changeConsent() : null,
      onDeleted: () => this.finish(this.shell.t.deleted),
      onEnded: () => this.finish(this.shell.t.ended),
    });
  }

  private async start(): Promise<void> {
    const { shell, api, widgetId } = this;
    this.active = true;
    this.ended = false;
    shell.screen();
    shell.status(shell.t.connecting);
    try {
      const config = await retryUnavailable(() =>
        api.client.getWidgetConfig({ widgetId, languages: visitorLanguages() }, CALL),
      );
      shell.textLang = config.language;
      const visitorToken = readStored(widgetId)?.token ?? "";
      const visit = await retryUnavailable(() =>
        api.client.startVisit({ widgetId, visitorToken }, CALL),
      );
      this.config = config;
      this.resumed = visit.resumed;
      this.given = visit.resumed ? null : new Set();
      api.setToken(visit.visitorToken);
      this.token = visit.visitorToken;
      const current = config.consentText;
      const answer = visit.consent;
      // Only a resumed visit has an answer; one granted to the current text stays remembered.
      this.keep(current !== undefined && answer?.version === current.version && answer.granted);
      shell.setResume(true);
      shell.setMyData(true);
      shell.status("");
      if (current && (!answer || answer.version !== current.version)) {
        this.ask(() => this.afterConsent());
      } else {
        this.granted = answer?.granted ?? false;
        this.afterConsent();
      }
    } catch (err) {
      this.active = false;
      this.failed(err, () => void this.start());
    }
  }

  /** Asks the consent question, records the answer, then goes on with `then`. */
  private ask(then: () => void): void {
    const config = this.config;
    const text = config?.consentText;
    if (!config || !text) {
      then();
      return;
    }
    const rememberDays = config.rememberVisitors ? config.visitLifetimeDays : null;
    void askConsent(this.shell, text.text, config.privacyPolicyUrl, rememberDays).then(async (granted) => {
      try {
        await retryUnavailable(() =>
          this.api.client.giveConsent({ version: text.version, granted, language: text.language }, CALL),
        );
        this.granted = granted;
        this.keep(granted);
        this.shell.status("");
        then();
      } catch (err) {
        const f = failure(err);
        if (f.code === Code.FailedPrecondition && f.reason === "INVALID_STATE") {
          // A new consent text was published meanwhile: ask with that one.
          try {
            this.config = await this.api.client.getWidgetConfig(
              { widgetId: this.widgetId, languages: visitorLanguages() },
              CALL,
            );
            this.shell.textLang = this.config.language;
            this.ask(then);
          } catch (again) {
            this.failed(again, () => this.ask(then));
          }
          return;
        }
        this.failed(err, () => this.ask(then));
      }
    });
  }

  /** Stores the token: on this device when `granted` and the widget remembers visitors. */
  private keep(granted: boolean): void {
    if (this.token !== "") {
      writeStored(this.widgetId, { token: this.token }, granted && (this.config?.rememberVisitors ?? false));
    }
  }

  private afterConsent(): void {
    const config = this.config;
    if (!config) {
      return;
    }
    const t = this.shell.t;
    if (!this.granted && !config.allowAnonymousChat) {
      this.needConsent(t.consentNeeded);
    } else if (!this.granted && config.preChatFields.some((f) => f.personal && f.required)) {
      this.needConsent(t.personalNeedsConsent);
    } else if (this.resumed || this.fieldsDone || this.askable().length === 0) {
      this.openChat();
    } else {
      this.askFields();
    }
  }

  /** The fields that may be asked now: personal ones only with consent. */
  private askable(): PreChatField[] {
    return (this.config?.preChatFields ?? []).filter((f) => this.granted || !f.personal);
  }

  private needConsent(text: string): void {
    const button = h("button", { type: "button", "data-autofocus": true }, this.shell.t.reconsider);
    button.addEventListener("click", () => this.ask(() => this.afterConsent()));
    this.shell.screen(h("p", { class: "notice" }, text), button);
  }

  private askFields(): void {
    const fields = this.askable();
    this.personalAsked ||= fields.some((f) => f.personal);
    this.shell.screen(fieldsForm(this.shell, fields, (values) => this.submitFields(values)));
  }

  private async submitFields(values: FieldInput[]): Promise<void> {
    try {
      if (values.length > 0) {
        const stored = await retryUnavailable(() => this.api.client.submitFields({ fields: values }, CALL));
        this.given = new Set(stored.storedKeys);
      }
      this.fieldsDone = true;
      this.openChat();
    } catch (err) {
      const f = failure(err);
      // INVALID_FIELD names the field as "fields[1].value": say which one.
      const index = /^fields\[(\d+)\]/.exec(f.metadata["field"] ?? "")?.[1];
      const key = index === undefined ? undefined : values[Number(index)]?.key;
      const label = this.config?.preChatFields.find((d) => d.key === key)?.label;
      if (f.reason === "CONSENT_REQUIRED") {
        // The consent text changed since it was answered.
        this.ask(() => this.afterConsent());
      } else if (f.reason === "INVALID_FIELD" && label) {
        this.shell.status(this.shell.t.checkField(label), "error");
      } else {
        this.failed(err, null);
      }
    }
  }

  /**
   * A send needed consent (an offline message always does). Once granted, personal fields the
   * form could not show before are offered, say a contact to be answered at; then the chat.
   */
  private consentForChat(): void {
    this.ask(() => {
      const personal = this.askable().some((f) => f.personal);
      if (this.granted && personal && !this.personalAsked) {
        this.askFields();
      } else {
        this.afterConsent();
      }
      if (this.granted) {
        this.shell.status(this.shell.t.sendAgain);
      }
    });
  }

  /** "My data" asked to change the consent answer. */
  private changeConsent(): void {
    this.ask(() => void this.afterChange());
  }

  private async afterChange(): Promise<void> {
    const { shell } = this;
    const t = shell.t;
    if (!this.chat) {
      // Not chatting yet: the notice or form that the new answer calls for.
      this.afterConsent();
    } else if (this.granted) {
      let missing: PreChatField[];
      try {
        missing = await this.personalMissing();
      } catch (err) {
        this.failed(err, () => void this.afterChange());
        return;
      }
      if (missing.length > 0) {
        this.personalAsked = true;
        const texts = { title: t.moreFieldsTitle, submit: t.continueChat };
        shell.screen(fieldsForm(shell, missing, (values) => this.submitFields(values), texts));
      } else {
        this.openChat();
      }
    } else {
      this.openChat();
    }
    shell.status(this.granted ? t.consentRecorded : t.consentWithdrawn);
  }

  /** The widget's personal fields the visit does not hold yet. */
  private async personalMissing(): Promise<PreChatField[]> {
    if (this.given === null) {
      // A resumed visit: what it holds was given on an earlier page.
      const data = await retryUnavailable(() => this.api.client.getMyData({}, CALL));
      this.given = new Set(data.fields.map((f) => f.key));
    }
    const given = this.given;
    return (this.config?.preChatFields ?? []).filter((f) => f.personal && !given.has(f.key));
  }

  private openChat(): void {
    const config = this.config;
    if (!config) {
      return;
    }
    this.fieldsDone = true;
    if (!this.chat) {
      this.chat = new Chat({
        shell: this.shell,
        api: this.api,
        welcome: config.welcomeMessage,
        offlineMessage: config.offlineMessage,
        online: config.online,
        onEnded: () => this.finish(this.shell.t.ended),
        onNeedConsent: () => this.consentForChat(),
        onNeedFields: () => this.askFields(),
      });
      this.chat.start();
    }
    this.shell.screen(this.chat.element);
  }

  /**
   * The visit is over (ended, expired or deleted): stop following it and forget its token, so
   * no widget key is left in storage; a new chat starts only when the visitor asks for one.
   */
  private finish(text: string): void {
    this.chat?.stop();
    this.chat = null;
    this.config = null;
    this.active = false;
    this.ended = true;
    this.granted = false;
    this.resumed = false;
    this.fieldsDone = false;
    this.personalAsked = false;
    this.given = null;
    this.token = "";
    this.api.setToken(null);
    forgetStored(this.widgetId);
    const { shell } = this;
    shell.dismiss();
    shell.setResume(false);
    shell.setMyData(false);
    const again = h("button", { type: "button" }, shell.t.startNew);
    again.addEventListener("click", () => void this.start());
    shell.screen(h("p", { class: "notice" }, text), again);
    shell.status(text);
  }

  /** Says what went wrong; `retry`, when given, is offered as a button. */
  private failed(err: unknown, retry: (() => void) | null): void {
    const f = failure(err);
    const { shell } = this;
    if (f.code === Code.Unauthenticated && this.config) {
      this.finish(shell.t.ended);
      return;
    }
    shell.status(errorText(f, shell.t), "error");
    if (retry) {
      const button = h("button", { type: "button", "data-autofocus": true }, shell.t.tryAgain);
      button.addEventListener("click", retry);
      shell.screen(button);
    }
  }
}
