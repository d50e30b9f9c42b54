/**
 * "My data": the visitor's rights (CB9, GDPR Art. 15–17 and 20) inside the widget, without an
 * account or an e-mail to the organisation: see everything stored about the visit, correct the
 * details given, change the consent answer, download it as a file, delete it.
 *
 * Deletion asks once more inside the dialog (not window.confirm, which the host page could
 * stub and which blocks the page). A legal hold is said as such, since then nothing was
 * deleted. The download is built from the JSON the server returns, through an `<a download>`
 * inside the shadow root, so no second request and no page-level element is involved.
 */

import { type Api, CALL, Code, errorText, failure, retryUnavailable, sleep } from "./client";
import type { MyData, PreChatField } from "./gen/hafen/webchat/v1/webchat_pb";
import type { Shell } from "./shell";
import { busy, formatTime, h, uid } from "./ui";

export interface MyDataOptions {
  shell: Shell;
  api: Api;
  /** The widget's field declarations, for labels. */
  fields: readonly PreChatField[];
  /** Asks the consent question again; null when the widget asks none. */
  onChangeConsent: (() => void) | null;
  /** The data was deleted (or its deletion completed out of sight): forget the visit. */
  onDeleted(): void;
  /** The visit had ended before (its token is refused). */
  onEnded(): void;
}

export function openMyData(o: MyDataOptions): void {
  const { shell, api } = o;
  const t = shell.t;
  const titleId = uid("mydata-title");
  const content = h("div", { class: "mydata" }, h("p", null, t.loading));
  const closeButton = h("button", { type: "button", class: "ghost" }, t.back);
  const dialog = h(
    "div",
    { class: "modal", "data-hafen": "mydata-panel" },
    h("div", { class: "modal-head" }, h("h3", { id: titleId }, t.myData), closeButton),
    content,
  );
  const modal = shell.modal(dialog, titleId, () => modal.close());
  closeButton.addEventListener("click", () => modal.close());
  shell.status("");

  const fail = (err: unknown) => {
    const f = failure(err);
    if (f.code === Code.Unauthenticated) {
      modal.close();
      o.onEnded();
    } else {
      shell.status(errorText(f, t), "error");
    }
  };

  function render(data: MyData): void {
    content.replaceChildren(
      fieldsSection(data),
      consentSection(data),
      h("h4", null, t.messages(data.messages.length)),
      h(
        "ul",
        { class: "mydata-messages" },
        ...data.messages.map((m) =>
          h(
            "li",
            null,
            h("strong", null, `${m.fromVisitor ? t.you : t.agent}: `),
            m.deleteTime ? t.deletedMessage : m.body,
          ),
        ),
      ),
      actions(),
    );
  }

  function fieldsSection(data: MyData): HTMLElement {
    const section = h("section", null, h("h4", null, t.fields));
    if (data.fields.length === 0) {
      section.append(h("p", null, t.noFields));
      return section;
    }
    const rows = data.fields.map((field) => {
      const id = uid("mydata-field");
      const input = h("input", { id, type: "text", maxlength: 1000, "data-hafen": `mydata-field-${field.key}` });
      input.value = field.value;
      const label = o.fields.find((d) => d.key === field.key)?.label ?? field.key;
      const labelLang = o.shell.textLang || null;
      return {
        field,
        input,
        label,
        row: h("div", { class: "field" }, h("label", { for: id, lang: labelLang }, label), input),
      };
    });
    const save = h("button", { type: "submit", "data-hafen": "mydata-save" }, t.saveCorrections);
    const form = h("form", { novalidate: true }, ...rows.map((r) => r.row), h("div", { class: "actions" }, save));
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      const changed: { key: string; value: string; released: boolean }[] = [];
      for (const { field, input, label } of rows) {
        const value = input.value.trim();
        if (value === "") {
          // A value can be corrected, not emptied: deleting goes by "Delete my data".
          shell.status(t.fillIn(label), "error");
          input.focus();
          return;
        }
        if (value !== field.value) {
          // Stored personal fields were released when given; a correction keeps them so.
          changed.push({ key: field.key, value, released: true });
        }
      }
      if (changed.length === 0) {
        return;
      }
      void busy(save, async () => {
        try {
          render(await retryUnavailable(() => api.client.correctMyData({ fields: changed }, CALL)));
          shell.status(t.corrected);
        } catch (err) {
          fail(err);
        }
      });
    });
    section.append(form);
    return section;
  }

  function consentSection(data: MyData): HTMLElement {
    const section = h(
      "section",
      null,
      h("h4", null, t.consentAnswers),
      h(
        "ul",
        null,
        ...data.consentRecords.map((record) =>
          h("li", null, t.consentAnswer(record.version, record.granted, formatTime(record.decideTime, shell.lang, true))),
        ),
      ),
    );
    const change = o.onChangeConsent;
    if (change) {
      // Consent is withdrawn as easily as it was given (GDPR Art. 7(3)), and a "no" is not final.
      const button = h("button", { type: "button", "data-hafen": "consent-change" }, t.changeConsent);
      button.addEventListener("click", () => {
        modal.close();
        change();
      });
      section.append(h("div", { class: "actions" }, button));
    }
    return section;
  }

  function actions(): HTMLElement {
    const download = h("button", { type: "button", "data-hafen": "mydata-download" }, t.download);
    const remove = h("button", { type: "button", class: "danger", "data-hafen": "mydata-delete" }, t.deleteData);
    const confirm = h("button", { type: "button", class: "danger", "data-hafen": "mydata-delete-confirm" }, t.deleteConfirm);
    const cancel = h("button", { type: "button" }, t.cancel);
    const confirmation = h(
      "div",
      { class: "confirm", hidden: true, role: "group", "aria-label": t.deleteData },
      h("p", null, t.deleteWarning),
      h("div", { class: "actions" }, cancel, confirm),
    );

    download.addEventListener("click", () => {
      void busy(download, async () => {
        try {
          const exported = await retryUnavailable(() => api.client.exportMyData({}, CALL));
          const url = URL.createObjectURL(new Blob([exported.json], { type: "application/json" }));
          const link = h("a", { href: url, download: exported.fileName || "hafen-visit.json", hidden: true });
          dialog.append(link);
          link.click();
          link.remove();
          // Some browsers read the blob after click() returns.
          setTimeout(() => URL.revokeObjectURL(url), 30_000);
        } catch (err) {
          fail(err);
        }
      });
    });
    remove.addEventListener("click", () => {
      confirmation.hidden = false;
      remove.hidden = true;
      cancel.focus();
    });
    cancel.addEventListener("click", () => {
      if (confirm.getAttribute("aria-disabled") === "true") {
        return;
      }
      confirmation.hidden = true;
      remove.hidden = false;
      remove.focus();
    });
    confirm.addEventListener("click", () => void busy(confirm, erase));
    return h("div", { class: "actions column" }, download, remove, confirmation);
  }

  /**
   * DeleteMyData ends the visit first; UNAVAILABLE after that means the rest goes with the next
   * purge and the data is unreadable meanwhile, and a retry finds the token dead. So a refused
   * token after an UNAVAILABLE attempt counts as deleted; before any attempt failed, it means
   * the visit had ended on its own.
   */
  async function erase(): Promise<void> {
    let interrupted = false;
    for (const pause of [500, 1500, 0]) {
      try {
        await api.client.deleteMyData({}, CALL);
        modal.close();
        o.onDeleted();
        return;
      } catch (err) {
        const f = failure(err);
        if (f.code === Code.Unavailable && pause > 0) {
          interrupted = true;
          await sleep(pause);
          continue;
        }
        if (f.code === Code.Unauthenticated) {
          modal.close();
          if (interrupted) {
            o.onDeleted();
          } else {
            o.onEnded();
          }
        } else if (f.reason === "LEGAL_HOLD_ACTIVE") {
          shell.status(t.legalHold, "error");
        } else {
          shell.status(errorText(f, t), "error");
        }
        return;
      }
    }
  }

  retryUnavailable(() => api.client.getMyData({}, CALL)).then(render, fail);
}
